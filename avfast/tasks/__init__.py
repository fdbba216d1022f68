"""avfast.tasks: downstream heads, losses, metrics and formats, one file per task.

    segmentation   audio-visual segmentation (AVSBench S4 / MS3): the layout, a synthetic
                   tree of it, a CPU dataset, the AVS head on each method, the mask loss,
                   mIoU and F-score
    separation     mix-and-separate on DeepAVFusion: MUSIC-style solos, a synthetic set,
                   mixtures, the head, mask targets, the inverse STFT, SDR / SIR / SAR
    parsing        audio-visual video parsing (LLP): the format, a synthetic set, a CPU
                   dataset, HAN's parser on the per-second methods, the MIL loss, LLP's
                   segment- and event-level F1
    question_answering  audio-visual question answering (MUSIC-AVQA): the json, vocabularies,
                   templated synthetic questions, ST-AVQA's grounding head, accuracy per type
    text_classification  few- and zero-shot classification by class prompts of CLIP / CLAP
                   text towers (local weights), DG-SCT's two branches, k-shot linear probes
    localization   sounding-region maps (the AVS head's output, Grad-CAM) as PNG overlays
"""
