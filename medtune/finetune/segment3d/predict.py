"""``medtune predict`` for ``segment3d`` runs: the segmentation task's prediction, unchanged.

One NIfTI label map per case (the input's affine and header, the dataset's label
values), whole-volume MONAI sliding windows of the training crop size over the
z-scored, foreground-cropped volume; the network pads each window to its output stride
itself. The flags are those of segmentation prediction (``--overlap``, ``--tta``, ...).
"""

from medtune.finetune.segmentation.predict import add_predict_arguments, predict

__all__ = ["add_predict_arguments", "predict"]
