"""Text generation shared by training (methods that generate before or during training) and evaluation."""
