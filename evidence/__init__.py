"""Evidence for the paper's claims, one command per study (see README, "Evidence").

ablation       baseline / +EMA / +CDR / full over seeds: test top-1/top-5, spread, training time
robustness     accuracy under test-time corruptions (lighting, colour, viewpoint, blur, noise, occlusion)
figures        t-SNE of x_v / x_EMA / x_CDR with cluster scores (Figure 3), case-study grid (Figure 4)
cdr_inference  x_CDR accuracy and latency against the sampler, its steps and the averaged samples
results        docs/results.md assembled from what the studies wrote
corruptions    the corruption functions and their severity table
"""
