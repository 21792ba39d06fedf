"""Kubernetes resource quantities (``"8"``, ``"500m"``, ``"1Gi"``), parsed once.

Every shell that reads a quantity uses these functions: the extender's and
router's wire models (:mod:`joulepool.kube.objects`) and the operator's view
of a Node (:mod:`joulepool.operator.resources`). Input is bounded before any
arithmetic, so a value such as ``1e999999`` is refused at once instead of
being expanded into a million digits (or overflowing a float to ``inf``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation

from joulepool.api.contract import GPU_RESOURCE

#: a quantity as it appears in Kubernetes JSON
Quantity = str | int | float

_QUANTITY = re.compile(
    r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$"
)
_SUFFIX = {
    "": Decimal(1), "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"),
    "k": Decimal("1e3"), "M": Decimal("1e6"), "G": Decimal("1e9"), "T": Decimal("1e12"),
    "P": Decimal("1e15"), "E": Decimal("1e18"),
    "Ki": Decimal(2**10), "Mi": Decimal(2**20), "Gi": Decimal(2**30), "Ti": Decimal(2**40),
    "Pi": Decimal(2**50), "Ei": Decimal(2**60),
}

#: longest quantity string accepted (Kubernetes' own are far shorter)
MAX_QUANTITY_CHARS = 64
#: largest magnitude of a quantity: Kubernetes stores quantities as int64 (milli-units
#: and up), so nothing larger can come from a real API server
MAX_QUANTITY = Decimal(2**63 - 1)
#: largest decimal exponent of the number before the suffix (bounds it unexpanded)
_MAX_EXPONENT = 30


def parse_quantity(value: object) -> Decimal:
    """A Kubernetes resource quantity as a finite Decimal (in the resource's unit).

    ValueError, with a message naming the value, for anything else: not a string or
    number, malformed, magnitudes over :data:`MAX_QUANTITY` (``1e999``, ``1e999999``,
    ``inf``) and strings over :data:`MAX_QUANTITY_CHARS`.
    """
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"invalid quantity {value!r}: not a string or number")
    if isinstance(value, int):
        if abs(value) > MAX_QUANTITY:
            raise ValueError("quantity out of range (over 2^63)")
        return Decimal(value)
    if isinstance(value, float):
        if not math.isfinite(value) or abs(value) > MAX_QUANTITY:
            raise ValueError(f"quantity out of range: {value!r}")
        return Decimal(str(value))
    if len(value) > MAX_QUANTITY_CHARS:
        raise ValueError(f"invalid quantity {value[:MAX_QUANTITY_CHARS]!r}...: too long")
    m = _QUANTITY.match(value.strip())
    if not m:
        raise ValueError(f"invalid quantity {value!r}")
    try:
        number = Decimal(m.group(1))
    except InvalidOperation:
        raise ValueError(f"invalid quantity {value!r}") from None
    # adjusted(): exponent of the leading digit; bounds the magnitude without expanding it
    if number and number.adjusted() > _MAX_EXPONENT:
        raise ValueError(f"quantity out of range: {value!r}")
    q = number * _SUFFIX[m.group(2) or ""]
    if abs(q) > MAX_QUANTITY:
        raise ValueError(f"quantity out of range: {value!r}")
    return q


def quantity_to_int(value: object) -> int:
    """Whole units of a countable resource such as GPUs (fractions round up).

    Absent (None), bad, negative or out-of-range values are 0; use
    :func:`parse_quantity` where bad input must be refused with its reason."""
    if value is None:
        return 0
    try:
        q = parse_quantity(value)
    except ValueError:
        return 0
    if q <= 0:
        return 0
    return int(q.to_integral_value(rounding="ROUND_CEILING"))


def node_resource_count(status: Mapping[str, object] | None,
                        resource: str = GPU_RESOURCE) -> int:
    """Units of ``resource`` a Node offers, from its ``status`` (a JSON mapping):
    ``allocatable`` when the node reports the resource there, else ``capacity``
    (as kube-scheduler reads it: an allocatable of 0 means none, not "unknown").

    ValueError naming the field when the quantity is not one (see :func:`parse_quantity`).
    """
    status = status or {}
    for source in ("allocatable", "capacity"):
        res = status.get(source)
        if isinstance(res, Mapping) and resource in res:
            value = res[resource]
            try:
                parse_quantity(value)
            except ValueError as exc:
                raise ValueError(f"status.{source}[{resource!r}]: {exc}") from None
            return quantity_to_int(value)
    return 0
