# Overlay: manifold-constrained hyper-connections with 4 streams (DeepSeek mHC, 20 Sinkhorn iterations).
residual = "mhc"
hc_streams = 4
out_dir = out_dir + "-mhc"
