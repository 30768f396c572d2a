"""torch.fx passes and analyses that turn a transformer's blocks into Mixture-of-Depths blocks.

Run step by step on a model of your own::

    from modify import passes
    stack_name, stack = passes.find_block_stack(model)          # where the blocks are
    specs = passes.probe_block_calls(model, list(stack))        # how the parent calls them
    gm = passes.capture_block(stack[0], specs[0].structure)     # one block as an fx graph
    analysis = passes.analyze_residual(gm, specs[0].hidden)     # its residual stream and form
    passes.ExtractDeltaPass(specs[0].hidden)(gm)                # the graph now returns Δ
    print(gm.code)

A block form of your own: ``passes.register_block_form(passes.BlockForm("mine", lambda a: ...))``.

Each pass reads a block and returns what it found; none changes the model. May import: :mod:`modify.kernels`,
:mod:`modify.archs`, :mod:`modify.errors`.
"""

from __future__ import annotations

from modify.passes.analyze_residual import (
    BlockForm,
    ResidualAnalysis,
    analyze_residual,
    block_forms,
    register_block_form,
    unregister_block_form,
)
from modify.passes.capture_block import BlockTracer, CallStructure, call_structure, capture_block
from modify.passes.capture_delta import capture_delta
from modify.passes.extract_delta import ExtractDeltaPass
from modify.passes.find_block_stack import find_block_stack
from modify.passes.probe_block_calls import BlockCallSpec, probe_block_calls

__all__ = [
    "BlockCallSpec",
    "BlockForm",
    "BlockTracer",
    "CallStructure",
    "ExtractDeltaPass",
    "ResidualAnalysis",
    "analyze_residual",
    "block_forms",
    "call_structure",
    "capture_block",
    "capture_delta",
    "find_block_stack",
    "probe_block_calls",
    "register_block_form",
    "unregister_block_form",
]
