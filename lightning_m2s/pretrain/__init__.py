"""The recipes that make the shipped tiny SVD in weights/: `vae` (the video VAE), `prior` (the
image-to-video UNet, SVD's objective) and `export` (the diffusers directory and its manifest)."""
