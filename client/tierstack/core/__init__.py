"""What the tiers and the SDK share, without gRPC: JSON values (``values``), the one error tree
(``errors``), workflow specs and their templates (``workflow``, ``templates``), the run and goal state
machines (``lifecycle``), spans of the work (``tracing``) and budget warnings as people read them
(``budgets``)."""
