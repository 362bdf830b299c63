<?php
// sandgate's PHP harness: one invoke, as the source of one exec. gateway/functions/harness.py puts
// the call's parameters in the literal below (a JSON text), and the gateway reads the report this
// writes under the root's .sandgate/ folder. The working directory is the sandbox root.
//
// The code is a PHP file (it opens with <?php) evaluated at this file's top level, so its
// variables are globals as when it runs alone. The function is one it defines (or a global
// variable holding a closure); it gets the args, then the kwargs as PHP 8 named arguments
// (`f(...$args, ...$kwargs)`: an unknown name is PHP's own Error). The result is json_encode'd
// (objects as their public properties); what json_encode refuses is ResultNotSerializable.
namespace Sandgate\Harness;

final class Harness
{
    private const PRIVATE = '.sandgate';
    private const MAX_TRACKED = 10000;
    /** PHP's mtime has whole seconds: files whose mtime is this recent when the call starts, or
     * later, are also compared by content (the choice depends on size and mtime alone, so a file
     * whose size and mtime did not change is hashed in both snapshots or in neither). */
    private const RECENT_S = 2;
    private const MAX_HASHED = 16 << 20;

    public array $params;
    private string $root;
    private int $started;
    private array $before;
    private array $knownFunctions;

    public function __construct(string $json)
    {
        $this->params = json_decode($json, true, 512, JSON_THROW_ON_ERROR);
        $this->root = getcwd();
        $this->started = time();
        $this->before = $this->snapshot();
        $this->knownFunctions = get_defined_functions()['user'];
    }

    /** [[relative path => "size:mtime[:crc]"], truncated] of the regular files under the root
     * (not .sandgate/, not following symlinks). */
    private function snapshot(): array
    {
        clearstatcache();
        $files = [];
        $stack = [''];
        while ($stack) {
            $rel = array_pop($stack);
            $names = @scandir($rel === '' ? $this->root : "{$this->root}/{$rel}");
            if ($names === false) {
                continue;
            }
            foreach ($names as $name) {
                if ($name === '.' || $name === '..') {
                    continue;
                }
                $path = $rel === '' ? $name : "{$rel}/{$name}";
                if ($path === self::PRIVATE) {
                    continue;
                }
                $st = @lstat("{$this->root}/{$path}");
                if ($st === false) {
                    continue;
                }
                $type = $st['mode'] & 0170000;
                if ($type === 0040000) {
                    $stack[] = $path;
                } elseif ($type === 0100000) {
                    $key = "{$st['size']}:{$st['mtime']}";
                    if ($st['mtime'] >= $this->started - self::RECENT_S && $st['size'] <= self::MAX_HASHED) {
                        $key .= ':' . @hash_file('crc32b', "{$this->root}/{$path}");
                    }
                    $files[$path] = $key;
                    if (count($files) >= self::MAX_TRACKED) {
                        return [$files, true];
                    }
                }
            }
        }
        return [$files, false];
    }

    private function changes(array $after): array
    {
        [$before, $cutBefore] = $this->before;
        [$now, $cutAfter] = $after;
        $created = array_keys(array_diff_key($now, $before));
        $deleted = array_keys(array_diff_key($before, $now));
        $modified = [];
        foreach ($now as $path => $key) {
            if (isset($before[$path]) && $before[$path] !== $key) {
                $modified[] = (string) $path;
            }
        }
        $created = array_map('strval', $created);
        $deleted = array_map('strval', $deleted);
        sort($created, SORT_STRING);
        sort($deleted, SORT_STRING);
        sort($modified, SORT_STRING);
        $out = ['created' => $created, 'modified' => $modified, 'deleted' => $deleted];
        if ($cutBefore || $cutAfter) {
            $out['truncated'] = true;
        }
        return $out;
    }

    /** The error as the report carries it; the trace starts in the user's code. */
    public function errorOf(\Throwable $e): array
    {
        $lines = [];
        foreach ($e->getTrace() as $i => $frame) {
            $file = $frame['file'] ?? null;
            if ($file !== null && $file === __FILE__) {
                break; // the harness's own frames
            }
            $where = $file === null ? '[internal function]' : $this->fileName($file) . "({$frame['line']})";
            $call = ($frame['class'] ?? '') . ($frame['type'] ?? '') . $frame['function'];
            $lines[] = "#{$i} {$where}: {$call}()";
        }
        $head = get_class($e) . ': ' . $e->getMessage();
        if ($e->getFile() !== __FILE__) { // (raised by the call itself: a bad argument)
            $head .= ' in ' . $this->fileName($e->getFile()) . ':' . $e->getLine();
        }
        $trace = $lines ? $head . "\nStack trace:\n" . implode("\n", $lines) : $head;
        return ['type' => get_class($e), 'message' => $e->getMessage(), 'traceback' => $trace];
    }

    /** Code evaluated here is named as the call names it, not "harness(NN) : eval()'d code". */
    private function fileName(string $file): string
    {
        return str_starts_with($file, __FILE__) && str_ends_with($file, "eval()'d code") ? $this->params['filename'] : $file;
    }

    public function call(): array
    {
        $name = $this->params['function'];
        $defined = array_values(array_diff(get_defined_functions()['user'], $this->knownFunctions));
        $target = null;
        if (in_array(strtolower($name), $defined, true)) {
            $target = $name;
        } elseif (array_key_exists($name, $GLOBALS)) {
            if (!is_object($GLOBALS[$name]) || !is_callable($GLOBALS[$name])) {
                return $this->notFound($name, 'is not a function', $defined);
            }
            $target = $GLOBALS[$name];
        } else {
            return $this->notFound($name, 'is not defined by the code', $defined);
        }
        $value = $target(...$this->params['args'], ...$this->params['kwargs']);
        try {
            json_encode($value, JSON_THROW_ON_ERROR, 500); // the report holds it a level down
        } catch (\JsonException $e) {
            return ['status' => 'error', 'result' => null, 'error' => [
                'type' => 'ResultNotSerializable', 'traceback' => '',
                'message' => 'the function returned a ' . get_debug_type($value)
                    . ', which is not JSON-serialisable: ' . $e->getMessage()]];
        }
        return ['status' => 'success', 'result' => $value, 'error' => null];
    }

    private function notFound(string $name, string $what, array $defined): array
    {
        sort($defined);
        $names = $defined ? implode(', ', array_slice($defined, 0, 20)) : 'none';
        $hint = str_contains(ltrim($this->params['code']), '<?') ? '' : ' (PHP code opens with <?php)';
        return ['status' => 'error', 'result' => null, 'error' => [
            'type' => 'FunctionNotFound', 'traceback' => '',
            'message' => "'{$name}' {$what} (functions it defines: {$names}){$hint}"]];
    }

    public function report(array $outcome): void
    {
        $outcome['files'] = $this->changes($this->snapshot());
        // (an error's message may hold any bytes; the result was checked to be JSON above)
        $text = json_encode($outcome, JSON_THROW_ON_ERROR | JSON_PRESERVE_ZERO_FRACTION | JSON_INVALID_UTF8_SUBSTITUTE);
        $path = "{$this->root}/{$this->params['report']}";
        $dir = dirname($path);
        if (!is_dir($dir)) {
            mkdir($dir, 0777, true);
        }
        file_put_contents("{$path}.tmp", $text);
        rename("{$path}.tmp", $path);
    }
}

$__sandgate = new Harness(__PARAMS__);
try {
    // At top level: the code's own variables are globals, as when it runs alone.
    eval('?>' . $__sandgate->params['code']);
    $__sandgate_outcome = $__sandgate->call();
} catch (\Throwable $__sandgate_error) {
    $__sandgate_outcome = ['status' => 'error', 'result' => null, 'error' => $__sandgate->errorOf($__sandgate_error)];
}
$__sandgate->report($__sandgate_outcome);
