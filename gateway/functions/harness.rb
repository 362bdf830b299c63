# sandgate's Ruby harness: one invoke, as the source of one exec. gateway/functions/harness.py puts
# the call's parameters in the PARAMS literal below (a JSON text), and the gateway reads the report
# this writes under the root's .sandgate/ folder. The working directory is the sandbox root.
#
# The code is evaluated at top level (TOPLEVEL_BINDING: its `def`s are the functions to call, its
# lambdas in local variables too); the function gets the args and the kwargs as Ruby keyword
# arguments (a method without keyword parameters gets them as a final Hash, as Ruby passes them).
# The result must be JSON: nil, true, false, numbers (finite), strings (UTF-8), symbols (as
# strings), and arrays and hashes of them (keys strings, symbols or integers, which JSON writes as
# strings); anything else is ResultNotSerializable, never a silent to_s.
require "fileutils"
require "json"

module SandgateHarness
  PARAMS = JSON.parse(__PARAMS__)
  PRIVATE = ".sandgate"
  MAX_TRACKED = 10_000
  MAX_DEPTH = 1000
  ROOT = Dir.pwd
  HERE = __FILE__

  class NotJSON < StandardError; end

  # {relative path => [size, mtime seconds, mtime nanoseconds]} of the regular files under the
  # root (not .sandgate/, not following symlinks), and whether the walk stopped at MAX_TRACKED.
  def self.snapshot
    files = {}
    stack = [""]
    until stack.empty?
      rel = stack.pop
      begin
        names = Dir.children(rel.empty? ? ROOT : File.join(ROOT, rel))
      rescue SystemCallError
        next
      end
      names.each do |name|
        path = rel.empty? ? name : "#{rel}/#{name}"
        next if path == PRIVATE
        begin
          st = File.lstat(File.join(ROOT, path))
        rescue SystemCallError
          next
        end
        if st.directory?
          stack.push(path)
        elsif st.file?
          files[path] = [st.size, st.mtime.tv_sec, st.mtime.tv_nsec]
          return [files, true] if files.size >= MAX_TRACKED
        end
      end
    end
    [files, false]
  end

  def self.changes(before, after)
    out = {
      "created" => (after[0].keys - before[0].keys).sort,
      "modified" => after[0].keys.select { |p| before[0].key?(p) && before[0][p] != after[0][p] }.sort,
      "deleted" => (before[0].keys - after[0].keys).sort,
    }
    out["truncated"] = true if before[1] || after[1]
    out
  end

  def self.error_of(error)
    # The backtrace from the user's code on: the harness's own frames are left out.
    frames = (error.backtrace || []).reject { |line| line.start_with?(HERE) }
    head = "#{error.message} (#{error.class.name})"
    text = frames.empty? ? head : "#{frames[0]}: #{head}" + frames.drop(1).map { |f| "\n\tfrom #{f}" }.join
    { "type" => error.class.name.to_s, "message" => error.message.to_s, "traceback" => text }
  end

  # The value as plain JSON data (see the top), or NotJSON naming what is not.
  def self.plain(value, depth = 0, seen = {})
    raise NotJSON, "it is nested more than #{MAX_DEPTH} deep (or refers to itself)" if depth > MAX_DEPTH

    case value
    when nil, true, false, Integer then value
    when Float
      raise NotJSON, "#{value} is not a JSON number" unless value.finite?

      value
    when String, Symbol
      text = value.to_s
      begin
        # bytes (BINARY) are taken as UTF-8 if they are; other encodings are converted
        text = text.encoding == Encoding::BINARY ? text.dup.force_encoding(Encoding::UTF_8) : text.encode(Encoding::UTF_8)
      rescue EncodingError
        raise NotJSON, "a string cannot be converted to UTF-8"
      end
      raise NotJSON, "a string is not valid UTF-8" unless text.valid_encoding?

      text
    when Array, Hash
      raise NotJSON, "it refers to itself" if seen.key?(value.object_id)

      seen[value.object_id] = true
      out = if value.is_a?(Array)
              value.map { |item| plain(item, depth + 1, seen) }
            else
              value.to_h do |key, item|
                unless key.is_a?(String) || key.is_a?(Symbol) || key.is_a?(Integer)
                  raise NotJSON, "a hash key is an instance of #{key.class}, not a string"
                end

                [plain(key.to_s, depth + 1, seen), plain(item, depth + 1, seen)]
              end
            end
      seen.delete(value.object_id)
      out
    else
      raise NotJSON, "it holds an instance of #{value.class}"
    end
  end

  def self.report(outcome)
    path = File.join(ROOT, PARAMS["report"])
    FileUtils.mkdir_p(File.dirname(path))
    File.write("#{path}.tmp", JSON.generate(outcome, max_nesting: false))
    File.rename("#{path}.tmp", path)
  end

  def self.own_methods
    Object.private_instance_methods(false) + Object.public_instance_methods(false)
  end

  def self.target(name, defined)
    return TOPLEVEL_BINDING.receiver.method(name) if defined.include?(name.to_sym)

    if TOPLEVEL_BINDING.local_variable_defined?(name)
      value = TOPLEVEL_BINDING.local_variable_get(name)
      return value if value.respond_to?(:call)

      return "is not a function"
    end
    "is not defined by the code"
  end

  def self.invoke
    before = snapshot
    outcome = begin
      known = own_methods
      eval(PARAMS["code"], TOPLEVEL_BINDING, PARAMS["filename"], 1)
      defined = own_methods - known
      name = PARAMS["function"]
      fn = target(name, defined)
      if fn.is_a?(String)
        names = defined.map(&:to_s).sort.first(20)
        { "status" => "error", "result" => nil, "error" => {
          "type" => "FunctionNotFound", "traceback" => "",
          "message" => "'#{name}' #{fn} (functions it defines: #{names.empty? ? 'none' : names.join(', ')})",
        } }
      else
        kwargs = PARAMS["kwargs"].transform_keys(&:to_sym)
        value = fn.call(*PARAMS["args"], **kwargs)
        begin
          { "status" => "success", "result" => plain(value), "error" => nil }
        rescue NotJSON => e
          { "status" => "error", "result" => nil, "error" => {
            "type" => "ResultNotSerializable", "traceback" => "",
            "message" => "the function returned an instance of #{value.class}, which is not JSON-serialisable: " \
                         "#{e.message}",
          } }
        end
      end
    rescue SystemExit, SignalException
      raise # the exec ends without a report: a crash, or terminated
    rescue Exception => e # the user's code may raise anything
      { "status" => "error", "result" => nil, "error" => error_of(e) }
    ensure
      $stdout.flush
      $stderr.flush
    end
    outcome["files"] = changes(before, snapshot)
    report(outcome)
  end
end

SandgateHarness.invoke
