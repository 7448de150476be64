"""Time-series forecasting: S-Mamba with TSLib-compatible data, the iTransformer and DLinear baselines,
and a forecast CLI (`mambakit timeseries ...`). See README.md in this folder."""
