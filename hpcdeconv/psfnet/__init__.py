"""PSF-parameter regression (Shajkofci & Liebling, IEEE TIP 2020): PSF models, training
samples, spatially-variant PSF maps and depth from astigmatism."""
