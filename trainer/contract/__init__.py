"""What the stages, the executors and the chart share: stage list, lineage, output folders, r1_stage.json."""
