"""Sequential recommendation: RecBole atomic data, leave-one-out full-ranking evaluation, Mamba4Rec, TiM4Rec,
SASRec, GRU4Rec and most-popular in one harness. See README.md in this folder."""
