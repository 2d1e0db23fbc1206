"""Model kinds: each kind is one class, registered by name in ``KINDS`` (``common.kinds.base``).

A kind says how its model is scored (one sequence per (query, passage) pair, or each text
embedded alone), what the runners and exported graphs output, what a query costs, and how a
training batch becomes loss inputs. ``cross`` (``common.kinds.cross``) and ``bi``
(``common.kinds.bi``) are the two; everyone else asks the kind object (``kind_of``), never
compares its name.
"""
from common.kinds.base import KINDS, Forward, ModelKind, kind_of, register_kind  # noqa: F401
from common.kinds import cross, bi  # noqa: F401 (registers the kinds, cross first: the default)
from common.kinds.bi import BiKind  # noqa: F401
from common.kinds.cross import CrossKind  # noqa: F401
