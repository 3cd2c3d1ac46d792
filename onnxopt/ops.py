"""Written specs of onnxopt's custom operators (what `onnxopt list` prints).

Every custom op has one spec here-by-registration: its reference module in onnxopt.reference defines
`SPEC = OpSpec(...)` next to the numpy function that implements exactly those semantics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class OpSpec:
    """Inputs, attributes, constraints and formula of one custom op (domain `onnxopt`, version 1)."""

    name: str
    summary: str
    inputs: list[tuple[str, str]]  # (name, "type and shape; what it is")
    outputs: list[tuple[str, str]]
    attributes: list[tuple[str, str]] = field(default_factory=list)
    constraints: list[str] = field(default_factory=list)
    formula: str = ""
    reference: Callable | None = None  # the numpy reference implementation

    def describe(self) -> str:
        """Multi-line human-readable spec."""
        lines = [f"{self.name} (domain onnxopt, version 1): {self.summary}"]
        for title, items in (
            ("inputs", self.inputs),
            ("outputs", self.outputs),
            ("attributes", self.attributes),
        ):
            if items:
                lines.append(f"  {title}:")
                lines += [f"    {n}: {d}" for n, d in items]
        if self.constraints:
            lines.append("  constraints:")
            lines += [f"    - {c}" for c in self.constraints]
        if self.formula:
            lines.append("  formula:")
            lines += [f"    {ln}" for ln in self.formula.strip().splitlines()]
        return "\n".join(lines)


def all_specs() -> dict[str, OpSpec]:
    """Every custom op's spec, by op type."""
    from onnxopt.reference import SPECS

    return dict(SPECS)
