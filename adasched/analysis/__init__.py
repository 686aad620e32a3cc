"""Measuring what schedules do: evaluation, run and sweep tables, step statistics, figures, dashboards, logging."""
