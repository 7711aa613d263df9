"""The learning tasks' vocabulary, shared by the settings and the contracts.

It imports nothing of Streamlearn's, so the record contract (records.py), the model contract
(models.py) and the settings (config/) can all name a task without importing each other.
"""

from typing import Literal

Task = Literal["regression", "binary", "multiclass"]
