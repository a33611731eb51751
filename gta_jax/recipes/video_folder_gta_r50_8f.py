"""video_folder_gta_r50_8f: GTA in a ResNet-50 (8 frames) on a folder of your own videos.

  python train.py --config configs/video_folder_gta_r50_8f.py --workdir runs/mine \
      --config.data.manual_dir=/path/to/my_videos --config.model.num_classes=K \
      --config.model.pretrained=weights/resnet50-0676ba61.pth

`my_videos/{train,val}/<class>/*.mp4` (or the other layouts of docs/data.md). TSM's
recipe (`config_lib.k400_config`) with a schedule for a small dataset: set
`total_steps` to about 50 epochs, `50 * train videos / batch_size`.
"""

from gta_jax import config_lib


def get_config():
  c = config_lib.k400_config(8, 'gta')
  c.data.dataset = 'video_folder'
  c.data.eval_split = c.eval.split = 'val'
  c.batch_size = 16
  c.total_steps = 2000
  c.optim.warmup_steps = 100
  c.log_every_steps = 20
  c.checkpoint_every_steps = 500
  c.eval_every_steps = 500
  return c
