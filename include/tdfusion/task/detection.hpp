#pragma once
// Detection task policies: Yolov8Detector (the release's YOLOv8-n), SmallDetector (fast CPU stand-in), the
// YOLOv8 loss they share (task-aligned assigner, BCE, CIoU, DFL), box geometry and NMS, and the batched
// DetectionTarget. A task policy offers `Target`, `loss(fused, target)` and `forward(image)`.

#include "tdfusion/task/detection/assigner.hpp"
#include "tdfusion/task/detection/box_ops.hpp"
#include "tdfusion/task/detection/common.hpp"
#include "tdfusion/task/detection/head.hpp"
#include "tdfusion/task/detection/small_detector.hpp"
#include "tdfusion/task/detection/target.hpp"
#include "tdfusion/task/detection/yolo_loss.hpp"
#include "tdfusion/task/detection/yolov8.hpp"
