"""Metrics of maps computed in the same run as the maps (`evaluate.*`), one module per family:
perturbation curves (ROAD), confidence under the map, localization against annotated boxes
(pointing games) and sparseness. Each takes a batch's maps [N, K, h, w] with its targets [N, K]
and returns per-input values [N, K] (or curves [N, K, P]), stored as `<output>.<metric>` columns."""
