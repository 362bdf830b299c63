<?php
// sandgate's PHP prelude (auto_prepend_file, before the program). The WASI build is php-cgi, which
// has no STDIN/STDOUT/STDERR constants and cannot open php://stdin, php://stdout or php://stderr
// (it would dup() the descriptor, which WASI lacks). They are given here: stdin from the file the
// runtime wrote beside the program, stdout through PHP's output (so it keeps its order with echo),
// stderr through the SAPI's logger, which writes a line at a time (a last line without a newline
// gets one). Every other php:// stream is PHP's own. The sandbox's files are the working directory.
namespace Sandgate;

final class Stdio
{
    /** @var resource|null */
    public $context;
    private static string $pending = '';
    /** @var resource|false|null */
    private $handle = null;
    private bool $stderr = false;

    public static function writeStderr(string $data): int
    {
        self::$pending .= $data;
        $end = strrpos(self::$pending, "\n");
        if ($end !== false) {
            foreach (explode("\n", substr(self::$pending, 0, $end)) as $line) {
                error_log($line, 4);
            }
            self::$pending = substr(self::$pending, $end + 1);
        }
        return strlen($data);
    }

    public static function flushStderr(): void
    {
        if (self::$pending !== '') {
            error_log(self::$pending, 4);
            self::$pending = '';
        }
    }

    public function stream_open(string $path, string $mode, int $options, ?string &$opened): bool
    {
        $what = strtolower(substr($path, strlen('php://')));
        if ($what === 'stderr') {
            return $this->stderr = true;
        }
        if ($what === 'stdin') {
            $this->handle = fopen('/sandgate/stdin', 'rb');
        } else {
            // PHP's own wrapper, for this open only.
            stream_wrapper_restore('php');
            try {
                $this->handle = fopen($what === 'stdout' ? 'php://output' : $path, $mode);
            } finally {
                stream_wrapper_unregister('php');
                stream_wrapper_register('php', self::class);
            }
        }
        return $this->handle !== false;
    }

    public function stream_write(string $data): int
    {
        return $this->stderr ? self::writeStderr($data) : (int) fwrite($this->handle, $data);
    }

    public function stream_read(int $count): string|false
    {
        return $this->stderr ? false : fread($this->handle, $count);
    }

    public function stream_eof(): bool
    {
        return $this->stderr || feof($this->handle);
    }

    public function stream_flush(): bool
    {
        return $this->stderr || fflush($this->handle);
    }

    public function stream_close(): void
    {
        if ($this->handle) {
            fclose($this->handle);
        }
    }

    public function stream_seek(int $offset, int $whence): bool
    {
        return !$this->stderr && fseek($this->handle, $offset, $whence) === 0;
    }

    public function stream_tell(): int
    {
        return $this->stderr ? 0 : (int) ftell($this->handle);
    }

    public function stream_truncate(int $size): bool
    {
        return !$this->stderr && ftruncate($this->handle, $size);
    }

    public function stream_stat(): array|false
    {
        return $this->stderr ? [] : fstat($this->handle);
    }

    public function stream_set_option(int $option, int $arg1, ?int $arg2): bool
    {
        return false;
    }

    public function stream_lock(int $operation): bool
    {
        return !$this->stderr && flock($this->handle, $operation);
    }

    public function url_stat(string $path, int $flags): array|false
    {
        return false;
    }
}

\define('STDIN', fopen('/sandgate/stdin', 'rb'));
\define('STDOUT', fopen('php://output', 'wb'));
stream_wrapper_unregister('php');
stream_wrapper_register('php', Stdio::class);
\define('STDERR', fopen('php://stderr', 'wb'));
// Registered during shutdown, it runs after the program's own shutdown functions, which may write too.
register_shutdown_function(static fn () => register_shutdown_function([Stdio::class, 'flushStderr']));
chdir('/work');
