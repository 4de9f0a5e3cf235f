"""A latent rectified-flow text-to-image model that memorises one image: the latent T-shirt data and
VAE of `recipes/latent_tshirt`, with a small SD3 transformer trained by flow matching, written as a
StableDiffusion3Pipeline by `retrack pretrain --config src/retrack/recipes/latent_flow/recipe.yaml`."""
