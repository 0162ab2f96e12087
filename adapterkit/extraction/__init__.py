"""Extraction: a LoRA adapter from a base model and a fine-tune of it, streamed, in bounded memory.

* :mod:`~adapterkit.extraction.plan`: what will be extracted, from the two models' headers;
* :mod:`~adapterkit.extraction.pair`: the two models read side by side, one tensor at a time;
* :mod:`~adapterkit.extraction.lowrank`: the maths (leading singular triplets, rank choice), no files;
* :mod:`~adapterkit.extraction.extractor`: :func:`extract`, which runs a plan into an ``Adapter``.
"""

from __future__ import annotations

from adapterkit.extraction.extractor import ExtractProgress, extract
from adapterkit.extraction.plan import ALL_LINEAR, ExtractionPlan, PlannedModule, Selection, plan_extraction

__all__ = [
    "ALL_LINEAR",
    "ExtractProgress",
    "ExtractionPlan",
    "PlannedModule",
    "Selection",
    "extract",
    "plan_extraction",
]
