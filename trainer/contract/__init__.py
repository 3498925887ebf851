"""The contract between stages, executors and the chart: stage list, lineage, output folders, r1_stage.json (stdlib + yaml only)."""
