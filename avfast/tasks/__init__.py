"""avfast.tasks: downstream heads, losses, metrics and formats, one file per task.

    segmentation   audio-visual segmentation (AVSBench S4 / MS3): the S4/MS3 layout and a synthetic tree of it, mask loss, mIoU and F-score
"""
