# Overlay: dynamic hyper-connections with 4 streams (Zhu et al., DHC x4).
residual = "hc"
hc_streams = 4
hc_dynamic = True
out_dir = out_dir + "-hc"
