"""The jobs that run on Ray: training (and the tower pretraining cache), triplet generation, gallery indexing."""
