<?php
// A website's balance writer: adds one coin to a user's balance file, again and again,
// the way a PHP site does it safely against its own concurrent requests.
// Usage: php add_balance.php FILE SECONDS [inplace|rename]
//   inplace (default): open, flock(LOCK_EX), read, decode, add, rewrite in place, unlock.
//   rename: open, flock(LOCK_EX), check the locked file is still the one at FILE (another
//           writer may have renamed a new one over it), read, write a temporary file,
//           rename it over FILE, unlock.
// Prints the number of increments written: the ground truth the sync is checked against.
$file = $argv[1];
$end = microtime(true) + floatval($argv[2]);
$mode = $argv[3] ?? 'inplace';
$done = 0;
while (microtime(true) < $end) {
    $fp = fopen($file, $mode === 'rename' ? 'r' : 'c+');
    if ($fp === false) {
        usleep(2000);
        continue;
    }
    if (!flock($fp, LOCK_EX)) {
        fclose($fp);
        continue;
    }
    clearstatcache(true, $file);
    $now = @stat($file);
    if ($now === false || fstat($fp)['ino'] !== $now['ino']) {
        // Replaced while we waited for the lock: start again on the new file.
        flock($fp, LOCK_UN);
        fclose($fp);
        continue;
    }
    $data = json_decode(stream_get_contents($fp), true);
    if (is_array($data)) {
        $data['balance'] += 1;
        $text = json_encode($data) . "\n";
        if ($mode === 'rename') {
            $tmp = $file . '.site-tmp';
            file_put_contents($tmp, $text);
            rename($tmp, $file);
        } else {
            ftruncate($fp, 0);
            rewind($fp);
            fwrite($fp, $text);
            fflush($fp);
        }
        $done++;
    }
    flock($fp, LOCK_UN);
    fclose($fp);
    usleep(3000);
}
echo $done, "\n";
