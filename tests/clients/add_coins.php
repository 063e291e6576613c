<?php
// A website's writer: adds one coin to a user in its own PDO transaction, again and
// again. Usage: php add_coins.php DB SECONDS USER_ID. Prints the number of increments
// that committed: the ground truth the sync is checked against.
$db = new PDO('sqlite:' . $argv[1]);
$db->setAttribute(PDO::ATTR_ERRMODE, PDO::ERRMODE_EXCEPTION);
$db->setAttribute(PDO::ATTR_TIMEOUT, 10);
$user = intval($argv[3]);
$end = microtime(true) + floatval($argv[2]);
$committed = 0;
$add = $db->prepare('UPDATE users SET coins = coins + 1 WHERE id = ?');
while (microtime(true) < $end) {
    try {
        $db->exec('BEGIN IMMEDIATE');
        $add->execute([$user]);
        $db->exec('COMMIT');
        $committed++;
    } catch (PDOException $e) {
        try {
            $db->exec('ROLLBACK');
        } catch (PDOException $e2) {
        }
    }
    usleep(2000);
}
echo $committed, "\n";
