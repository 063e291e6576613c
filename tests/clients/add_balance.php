<?php
// A website's balance writer: adds one coin to a user's balance file, again and again,
// the way a PHP site does it safely against its own concurrent requests: open the file,
// flock(LOCK_EX), read, decode, add, rewrite in place, unlock.
// Usage: php add_balance.php FILE SECONDS. Prints the number of increments written:
// the ground truth the sync is checked against.
$file = $argv[1];
$end = microtime(true) + floatval($argv[2]);
$done = 0;
while (microtime(true) < $end) {
    $fp = fopen($file, 'c+');
    if ($fp === false) {
        usleep(2000);
        continue;
    }
    if (flock($fp, LOCK_EX)) {
        $text = stream_get_contents($fp);
        $data = json_decode($text, true);
        if (is_array($data)) {
            $data['balance'] += 1;
            ftruncate($fp, 0);
            rewind($fp);
            fwrite($fp, json_encode($data) . "\n");
            fflush($fp);
            $done++;
        }
        flock($fp, LOCK_UN);
    }
    fclose($fp);
    usleep(3000);
}
echo $done, "\n";
