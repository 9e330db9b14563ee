"""Whole slides: reading at a pixel size, tissue masks, regions, streaming prediction, summaries.

* :mod:`cellkit.wsi.reader`: :func:`open_slide` (OpenSlide formats and plain images);
* :mod:`cellkit.wsi.tissue`: where the tissue is, from a thumbnail;
* :mod:`cellkit.wsi.regions`: QuPath GeoJSON annotation polygons to count in;
* :mod:`cellkit.wsi.summary`: counts, index and densities per slide and region, thumbnail;
* :mod:`cellkit.wsi.pipeline`: :func:`predict_slide`, a whole slide in bounded memory.
"""

from cellkit.wsi.reader import SLIDE_SUFFIXES, Slide, SlideError, is_whole_slide, open_slide

__all__ = ["SLIDE_SUFFIXES", "Slide", "SlideError", "is_whole_slide", "open_slide"]
