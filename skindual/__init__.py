"""skindual: synthetic skin-lesion image + segmentation-mask pairs at scale (SkinDualGen on Ray)."""

__version__ = "0.1.0"
