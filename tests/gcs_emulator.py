"""`python -m tests.gcs_emulator PORT BUCKET`: gcp-storage-emulator on 127.0.0.1, in memory.

One gap of the emulator is closed here: its media downloads carry no `x-goog-generation`
header, which Google Cloud Storage sends (https://cloud.google.com/storage/docs/xml-api/
reference-headers#xgooggeneration) and tensorstore reads to make its conditional writes (Orbax's
OCDBT manifest is rewritten that way while a checkpoint is written). Without it a rewrite fails
with "Malformed StorageGeneration". tensorstore reads through the JSON API
(`/storage/v1/b/B/o/O?alt=media`), whose handler `objects.get` calls the module's `download`
directly, so the module attribute is replaced, not only the download route.
"""

import sys
import time

from gcp_storage_emulator import server
from gcp_storage_emulator.handlers import objects


_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  try:
    obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
  except Exception:  # pylint: disable=broad-except
    return  # not found: the handler already answered 404
  response['x-goog-generation'] = str(obj['generation'])
  response['x-goog-metageneration'] = str(obj.get('metageneration', '1'))


def main(port: int, bucket: str) -> None:
  objects.download = _download_with_generation  # what objects.get calls for ?alt=media
  server.HANDLERS = tuple(
      (regex, {method: _download_with_generation if handler is _download else handler
               for method, handler in handlers.items()})
      for regex, handlers in server.HANDLERS)
  emulator = server.create_server('127.0.0.1', port, in_memory=True, default_bucket=bucket)
  emulator.start()
  print(f'listening on 127.0.0.1:{port}', flush=True)
  while True:
    time.sleep(3600)


if __name__ == '__main__':
  main(int(sys.argv[1]), sys.argv[2])
