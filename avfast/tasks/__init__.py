"""avfast.tasks: downstream heads, losses, metrics and formats, one file per task.

    segmentation   audio-visual segmentation (AVSBench S4 / MS3): the layout, a synthetic
                   tree of it, a CPU dataset, the mask loss, mIoU and F-score
"""
