"""`llmneo sweep`: `grid` (the axes and the runs), `report` (the table, CSV and heatmap)."""
