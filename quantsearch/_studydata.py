"""Facts about a stored study that the search and the reports both read."""

from quantsearch.pipeline._location import mask_text, mask_url, sqlite_path
from quantsearch.pipeline._study_record import layer_order

__all__ = ["layer_order", "mask_text", "mask_url", "sqlite_path"]
