class Module(Module):
  __parameters__ = []
  __buffers__ = []
  __annotations__ = []
  __annotations__["0x5632554f27c0"] = __torch__.___torch_mangle_8.Module
  __annotations__["0x5632554f3b60"] = __torch__.___torch_mangle_9.Module
  __annotations__["0x5632554f2b60"] = __torch__.___torch_mangle_10.Module
  __annotations__["0x5632554f3860"] = __torch__.___torch_mangle_11.Module
