// Symbol visibility and the inline-variable spelling used by the public header.
#pragma once

#if defined(_WIN32)
#if defined(TORCH_MHA_BUILD_LIBRARY)
#define TORCH_MHA_API __declspec(dllexport)
#else
#define TORCH_MHA_API __declspec(dllimport)
#endif
#else
#define TORCH_MHA_API __attribute__((visibility("default")))
#endif

#if defined(_WIN32)
#define TORCH_MHA_INLINE_VARIABLE __declspec(selectany)
#else
#define TORCH_MHA_INLINE_VARIABLE __attribute__((weak))
#endif
