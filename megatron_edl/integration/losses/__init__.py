"""The auxiliary losses of an MoE layer: one module per loss, one interface, one registry.

:mod:`.base` (the term interface: compute, reduce, scale, attach, record; calibration, layer
index, metric registration), :mod:`.edl`, :mod:`.variance`, :mod:`.orthogonality` (one loss
each) and :mod:`.registry` (which losses exist, where each hooks in, how it is built, its
config branch and metric names). docs/CONTRIBUTING.md, "Adding a router loss".
"""
