"""Image sources: ImageFolder trees and Parquet tables, plus the generated demo data."""
from .sources import DataError, ImageReadError, ImageSource, Record, open_source

__all__ = ["DataError", "ImageReadError", "ImageSource", "Record", "open_source"]
