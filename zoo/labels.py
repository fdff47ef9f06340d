"""`zoo.labels`, as the README has named it: the ground module `zoo.core.labels`, re-exported."""

from .core.labels import *  # noqa: F401,F403
from .core.labels import __all__  # noqa: F401
