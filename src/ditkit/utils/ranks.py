"""This process's place among torchrun's processes, read from the environment torchrun sets, so that any
package can ask it without setting up (or importing) the process group."""
from __future__ import annotations

import os


def env_rank() -> int:
    """This process's global rank as torchrun sets it (RANK); 0 outside torchrun."""
    return int(os.environ.get("RANK", "0"))
