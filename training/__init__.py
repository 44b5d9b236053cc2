"""rwkvc.training."""
from rwkvc.packages import claim

claim(__name__, __file__)   # one import name: rwkvc.training

