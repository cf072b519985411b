"""Model classes the project trains itself (the convolutional beta-TCVAE) and their trainer."""
