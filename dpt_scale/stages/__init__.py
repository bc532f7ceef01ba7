"""The pipeline's stages, each runnable alone (`dpt-scale STAGE RECIPE`) under any launcher."""
