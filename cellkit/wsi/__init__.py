"""Whole slides: reading at a pixel size, tissue masks, regions, streaming prediction, summaries.

* [`cellkit.wsi.reader`][]: [`open_slide`][] (OpenSlide formats and plain images);
* [`cellkit.wsi.tissue`][]: where the tissue is, from a thumbnail;
* [`cellkit.wsi.regions`][]: QuPath GeoJSON annotation polygons to count in;
* [`cellkit.wsi.summary`][]: counts, index and densities per slide and region, thumbnail;
* [`cellkit.wsi.pipeline`][]: [`predict_slide`][cellkit.wsi.pipeline.predict_slide], a whole
  slide in bounded memory;
* [`cellkit.wsi.training`][]: the ``slides`` dataset format (train from annotated slides),
  registered on import.
"""

from cellkit.wsi import training as _training  # noqa: F401  registers the "slides" dataset format
from cellkit.wsi.reader import SLIDE_SUFFIXES, Slide, SlideError, is_whole_slide, open_slide

__all__ = ["SLIDE_SUFFIXES", "Slide", "SlideError", "is_whole_slide", "open_slide"]
