class Module(Module):
  __parameters__ = ["params/size", ]
  __buffers__ = []
  __annotations__ = []
  __annotations__["params/size"] = Tensor
  __annotations__["params/0"] = str
  __annotations__["params/1"] = str
  __annotations__["params/2"] = str
  __annotations__["params/3"] = str
  options : __torch__.___torch_mangle_14.Module
