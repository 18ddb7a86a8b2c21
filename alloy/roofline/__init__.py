"""Analytical roofline of a hybrid config: FLOPs, bytes, intensity, bottleneck and time per layer.

    from alloy.roofline import roofline
    r = roofline("hybrid-tiny", "H100", mode="decode", batch=1, context=32768)
    print(r.to_markdown())

Config-driven (never builds a model or an array); every layer kind declares its cost with
``@register_cost(kind)`` in ``alloy.roofline.costs``. See docs/roofline.md for the counting rules
and worked examples.
"""
from alloy.roofline.costs import (  # noqa: F401
    Cost,
    Workload,
    get_cost,
    register_cost,
    registered_costs,
    visible_pairs,
)
from alloy.roofline.hardware import PRESETS, CustomHardware, Hardware, get_hardware  # noqa: F401
from alloy.roofline.report import (  # noqa: F401
    MODES,
    Precision,
    RooflineReport,
    Row,
    WeightFormat,
    load_config,
    roofline,
)
