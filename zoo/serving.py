"""`zoo.serving`, as the README has named it: the ground module `zoo.core.serving`, re-exported."""

from .core.serving import *  # noqa: F401,F403
from .core.serving import __all__  # noqa: F401
