"""``make bench-slo``: the overload figures on every scenario with default settings (issue 20)
and the autoscaling signals scored against SLO risk (issue 21)."""
