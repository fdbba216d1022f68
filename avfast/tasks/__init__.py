"""avfast.tasks: downstream heads, losses, metrics and formats, one file per task.

    segmentation   audio-visual segmentation (AVSBench S4 / MS3): mask mIoU and F-score
"""
